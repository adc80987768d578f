"""The jobs the command line runs (generate, bench, embed): typed options in, results out.

A job opens the model's store once, resolves the compute dtype once, chooses the placement (the planner's
or the one given), runs the engine and returns what happened; the CLI prints it. Nothing here knows click.
"""
