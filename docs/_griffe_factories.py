"""A Griffe extension for the API pages: `scale_by_quad = _factory(Quad())` and the other
factories are built when `wkron_eqx._alias` is imported, so static analysis sees only an
assignment. This replaces those four attributes with the inspected functions (signature
and docstring), and leaves every other object to static analysis."""

import griffe


FACTORIES = ("quad", "skew", "scale_by_quad", "scale_by_skew")


class InspectFactories(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        if pkg.name != "wkron_eqx":
            return
        static = pkg["_alias"]
        inspected = griffe.inspect("wkron_eqx._alias")
        for name in FACTORIES:
            function = inspected[name]
            function.parent = static
            static.set_member(name, function)
