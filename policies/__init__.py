"""One module per policy. Each owns its behaviour and exposes ``build_route(ctx)`` and/or
``build_attempt(ctx)``; :mod:`proxy.pipeline` fixes the order they run in."""
