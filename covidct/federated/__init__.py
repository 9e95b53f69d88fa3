"""Federated training with Flower: one client per site trains the project's network on its own images, a
strategy (covidct/federated/strategies/) decides what leaves the site, and the run ends in the same run record
as a centralised one. Flower is the engine (its Simulation Runtime here); this package only says what a site
trains, shares and keeps."""

import os

# Flower and Ray report usage to their makers unless told not to, read when they are first imported: a hospital's
# run tells nobody anything it was not asked to.
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
