"""Report: Table I and its statistics (aggregations, t-tests, intervals, DeLong, calibration) from run records
(`python -m covidct.report`)."""
