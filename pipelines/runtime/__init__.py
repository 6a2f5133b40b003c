"""What runs stages and commands: the stage contract and registry, publishing, run paths, the
console and progress, Ray helpers."""
