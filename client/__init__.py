"""gradserve's client. Filled in by the client issue; the wire format lives here already."""
