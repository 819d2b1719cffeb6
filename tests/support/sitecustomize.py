"""Run by Python at start-up in every process the tests start (conftest.script_env puts this folder on PYTHONPATH):
lets torchvision read the synthetic CIFAR-10 batches. Nothing else; imports nothing heavy."""
import synthetic_cifar10

synthetic_cifar10.install()
