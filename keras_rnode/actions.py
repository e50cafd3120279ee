"""What a training watch does when a solve fails (`callbacks.SolverFailures`,
`rnode train --on-max-steps`): warn, skip the step, or stop.

In a module free of keras, so that the command line's help lists them
without loading it.
"""

ACTIONS = ("warn", "skip", "stop")
