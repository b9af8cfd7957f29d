"""A hospital's own runtime: the agent that keeps its SuperNode up, the gate that admits only approved
app versions, the warm executor, the approval list, and the site report. Site-owned: outside the app bundle."""
