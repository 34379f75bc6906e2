"""Interventions: what a flagged prompt gets. One `Intervention` interface; the method table
(`unlearnd.methods`) says which class serves which route."""
