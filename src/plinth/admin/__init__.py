"""The admin API (`/api/…`, in `api.py`) and the CLI commands that call it over HTTP (`cli.py`).

Nothing is imported here so that `plinth keys …` does not load the server side.
"""
