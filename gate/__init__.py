"""The clinical gate (numpy only, used by ``build`` and ``check``): metrics, non-inferiority, int8-vs-fp32 gate,
image-quality summary, reports and plots."""
