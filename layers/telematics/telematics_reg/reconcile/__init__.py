"""Flow 6, reconciliation: the table checked against the upstream.

* :mod:`~telematics_reg.reconcile.adoption`: the users a lost CreateMany answer left upstream, found and stored;
* :mod:`~telematics_reg.reconcile.audit`: drift (users gone, deactivated, re-flagged or moved elsewhere, and
  users of ours we do not store), found by walking pages, resumable, never two at once;
* :mod:`~telematics_reg.reconcile.admin`: the admin JWT both list users with;
* :mod:`~telematics_reg.reconcile.service`: what the scheduled function does at each wake-up.
"""
