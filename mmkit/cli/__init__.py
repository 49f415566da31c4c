"""The command-line interface: `app.py` owns the Typer app, one thin module per command."""
