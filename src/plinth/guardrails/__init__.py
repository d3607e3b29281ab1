"""Guardrails: input and output scanners grouped into profiles (PII, secrets, injection, topics...).

Kept import-light: `plinth.config.schema` imports `plinth.guardrails.config`, which loads this
package first. The engine lives in `plinth.guardrails.engine`, scanners in their own modules.
"""
