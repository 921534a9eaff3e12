"""Python-backend models. `entry.py` is copied as every python model's `model.py`; it puts the
package on sys.path and delegates to the module named by the RESRANK_MODEL parameter."""
