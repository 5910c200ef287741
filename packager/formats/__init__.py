"""Bundle formats as data that the planner and the converters share: each format's quant schemes
(typed, with exact bytes) and the layout of its weights, so a plan sizes exactly what a converter writes."""
