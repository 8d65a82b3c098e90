"""What the user sees: log lines and progress, the HTML report, MLflow tracking."""
