"""Reading question/answer data: users' JSON-lines files and the TOFU benchmark."""
