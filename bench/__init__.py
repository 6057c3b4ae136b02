"""The gateway benchmark: CityPlane's gateway against nginx, same upstream, same run.

``python -m bench`` (or ``make bench``) measures every configuration with ``wrk`` on a pinned
core, interleaved over several rounds, and reports medians as ratios to nginx measured in the
same run. Method and latest numbers: ``docs/perf.md``; usage: ``bench/README.md``.
"""
