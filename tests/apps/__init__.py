"""Task modules that tests load both in the test process and in real worker processes."""
