"""GRACE (SPEC section 13): a codebook adapter at one layer. This package holds its settings and the codebook rules;
the LightningModule, edit kind and configs are not written yet (issue 38)."""
