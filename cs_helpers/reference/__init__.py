"""Reference implementations of every graded function (instructors only).

``cs_helpers.reference.<topic>`` mirrors ``notebooks/<NN_topic>/<topic>.ipynb``; each
function has the name and signature of the contract in the course documentation.
The student release of the package leaves this subpackage out.
"""
