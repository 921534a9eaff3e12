from resrank_export.cli import main

main(prog_name="resrank-export")
