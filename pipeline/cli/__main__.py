"""`python -m pipeline.cli ...` is `lipsync ...`."""
from pipeline.cli.main import main

main()
