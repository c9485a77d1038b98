"""Flow 5, the user lifecycle: profile and flag updates, deactivation and reactivation, deletion (erasure), moves.

``changes``   parsing of the five detail-types, queue messages and ``Action`` rows into one :class:`LifecycleChange`
``records``   the per-user order marker, the lease and the tombstone (conditional writes on the tokens table)
``admin``     the one admin session of the fleet, stored encrypted in the table and refreshed under a lease
``erasure``   removal of a deleted user's dead letters
``service``   applies one change upstream and here, in order, final for deletions
``intake``    a delivered message becomes an applied change, a retry, a drop with its reason, or a dead letter
``events``    the outcome events (ids and reasons only)
"""
