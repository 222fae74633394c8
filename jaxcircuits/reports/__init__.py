"""Reports: findings, markdown, plots, HTML views."""
