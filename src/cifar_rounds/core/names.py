"""Names shared by the stages, the tracking and the report, declared once (and importable without torch)."""

BEST_CHECKPOINT = "best.pt"  # in the train stage's models folder: the best epoch's weights
LAST_CHECKPOINT = "last.pt"  # the whole training state, to resume from
TRAINER_LOCK = ".train.lock"  # suffix of `.<models folder><suffix>`, held by the one trainer writing it

# MLflow artifact folders of a run
CHECKPOINT_ARTIFACTS = "checkpoints"
EVALUATION_ARTIFACTS = "evaluation"
REPORT_ARTIFACTS = "report"  # the round report
SWEEP_REPORT_ARTIFACTS = "sweep_report"  # the sweep report, on the sweep's parent run
PARAMS_ARTIFACTS = "params"  # params.yaml as it was at each (re)start of a run

LOGGED_MODEL = "model"  # the name of each run's MLflow LoggedModel (its best model)

RUN_CONDITIONS = ("device", "precision", "denormals", "layout")  # what params.yaml leaves to the machine

# set for the trainings that workers start side by side (a sweep's, replicates'): how many the project trains at once
TRAININGS_ENV = "CIFAR_ROUNDS_TRAININGS"

# the environment an `mlflow server` or `mlflow ui` of ours runs with: without MLflow's job runner (its GenAI jobs),
# eight more processes, each importing MLflow (about 50 s of CPU a start on 2 cores), that nothing here uses
MLFLOW_SERVER_QUIET_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
