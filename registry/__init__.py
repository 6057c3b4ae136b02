"""The registry: CityPlane's control plane (admin API, store, lifecycle, watch stream).

Start it with `registry.app.start_registry(RegistrySettings(...))` or `registry.app.run(...)`;
the HTTP contract is docs/registry-api.md.
"""
