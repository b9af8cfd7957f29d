"""A hospital's own runtime: the agent that keeps its SuperNode up, the gate that admits only approved
app versions, the warm executor, the approval list, and the site report; every Flower internal they
use comes through flower_seam.py. Site-owned: outside the app bundle."""
