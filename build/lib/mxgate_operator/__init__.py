"""mxgate's control plane: policy loading, the adaptive limit controller and the kopf operator.

Imported as ``mxgate_operator`` (never ``operator``, which is the standard library's).
"""
