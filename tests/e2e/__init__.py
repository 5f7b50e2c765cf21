"""End-to-end tests against the real control plane (marker ``e2e``)."""
