"""Report: Table I, paired t-tests and ROC curves from run records (`python -m covidct.report`)."""
