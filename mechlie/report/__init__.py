"""mechlie.report: drawing and writing results, never computing them.

- :mod:`mechlie.report.figures`: the one figure library (house style, CI error bars and bands, null
  markers, side-by-side panels) and the one save function (HTML + SVG + PNG, atomically);
- :mod:`mechlie.report.markdown`: ``report.md`` from already-loaded study results;
- :mod:`mechlie.report.views`: circuitsvis attention views and per-head readouts.

This layer sits below :mod:`mechlie.studies` and never imports it: a study's ``Result`` calls
these functions, and ``analyses/make_figures.py`` passes loaded results in.
"""
