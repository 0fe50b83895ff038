"""Offline tools for operators: sharding, capacity planning, the node doctor, the demo."""
