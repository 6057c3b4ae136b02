# The compiled copies of this package's modules go first on its __path__ when they match the
# sources (gateway/speedups.py); otherwise the Python sources here are imported.
from gateway.speedups import activate

activate(__name__, __path__)
