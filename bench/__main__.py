from bench.cli import main
from bench.identity import after_gateway

raise SystemExit(after_gateway(main()))
