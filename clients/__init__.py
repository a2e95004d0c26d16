"""On-device client side: the Flower ClientApp and client mods (federated training: issue 3)."""
