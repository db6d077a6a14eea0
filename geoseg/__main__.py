from geoseg.cli.main import cli

cli()
