from tune_cells.cli import main

main()
