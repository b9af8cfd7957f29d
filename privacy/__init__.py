"""Differential privacy, privacy budgets and audit logs (site-side core). Filled by later issues."""
