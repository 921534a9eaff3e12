"""Copied as `model.py` of every python-backend model. The stub ignores PYTHONPATH, so the
package folder comes from the model parameter RESRANK_PACKAGE_PATH (empty: the installed
package); the model itself is the module named by RESRANK_MODEL in this package."""

import importlib
import json
import sys


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        package_path = params.get("RESRANK_PACKAGE_PATH")
        if package_path and package_path not in sys.path:
            sys.path.insert(0, package_path)
        module = importlib.import_module(f"resrank_export.triton.models.{params['RESRANK_MODEL']}")
        self.model = module.Model(args, config, params)

    def execute(self, requests):
        return self.model.execute(requests)
