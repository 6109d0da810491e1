"""The search method above the model: update rules (architect), losses and complexity/latency costs, budgets."""
