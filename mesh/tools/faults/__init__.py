"""The fault-injection suite of ``python -m mesh faults`` (specs/faults.md F16-F19), in three
modules imported in one direction only: ``harness`` (requests, outcomes, the tally) <-
``scenarios`` (the catalogue) <- ``run`` (the runner, the table and the record). This file
imports none of them (spec AR3), so importing one never loads the others.
"""
