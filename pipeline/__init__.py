"""The toolchain's orchestration: ``build`` (model -> gated bundle, as stages) and ``check`` (re-gate a bundle)."""
