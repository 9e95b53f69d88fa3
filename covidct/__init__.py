"""covidct: multi-site COVID-19 CT classification (Wang, Liu, Dou, IEEE JBHI 2020) on Lightning + Hydra."""

__version__ = "0.1.0"
