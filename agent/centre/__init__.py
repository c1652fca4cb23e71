"""The supervision centre's side: receiver, store, fleet registry, keyring, evidence fetch.
Never imports the device side, the cameras (hw), vision, the installer's tools or the demo."""
