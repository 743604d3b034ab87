"""Stage ``merge``: give back part of the continual-pretraining update to get under the forgetting budget.

theta(a) = (1 - a) theta_base + a theta_cpt over the weights base and cpt share (every matrix, and the token rows
the base's own vocabulary owns); the rows of tokens the base never had take the cpt's values unscaled
(``interpolate``). Each interior ``a`` of ``merge.grid`` is scored by eval's scorer on eval's units and compared
with the base's scores eval recorded (``points``); a = 0 and a = 1 are eval's own records, never re-scored. The
largest ``a`` whose point passes the gate's rules is chosen (``frontier``), written as an HF folder and registered
(``register``, at the ops edge). ``run`` ties them together.
"""
