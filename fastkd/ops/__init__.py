"""One module per op family: its reference, registration, backend checks and public function."""
