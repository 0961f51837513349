"""Reliability of each member per domain, with labels or from agreement alone: `ensemble-train calibrate`."""
