"""Hospital site agent: the ClientApp, site identity and configuration, data loading, local training."""
