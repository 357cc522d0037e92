"""Evaluating an export: metrics (classification, explanation, rationale), CLIPScore, SPICE, inference placement,
efficiency, scoring a split (in process or on Ray actors), explanations and their gallery."""
