"""The simulator: an app's federated rounds with N simulated sites on one machine.

``flare simulate APP_DIR -w WORKSPACE -n SITES -r ROUNDS`` (see ``docs/simulator.md``) runs
the same run engine, aggregators, site worker, privacy filters and snapshot layout as a
real federation, with neither certificates nor agents: each simulated site is the agent's
task runtime on a local folder, called in-process. Modules: ``options`` (what a
simulation is asked to do, checked), ``sites`` (the simulated sites and their client),
``run`` (the workspace, the sites, the engine's rounds), ``command`` (the ``flare
simulate`` command line). Importing this package imports none of them.
"""
