"""Governance: the model hub, provider onboarding, approvals, policy as code, kill switch and audit.

Import from the submodules (`plinth.governance.engine`, `.audit`, ...): this package is imported by
the configuration schema, so it must stay free of heavy or circular imports.
"""
