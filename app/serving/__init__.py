"""Serving: exact ranking with filters, explanations, cold start, interests and churn reasons, over Neo4j."""
